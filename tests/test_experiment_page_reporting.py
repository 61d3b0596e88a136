"""experiments/page_reporting.py: the balloon's reporting bit, and the touch table."""
import pytest

from experiments import page_reporting


def _device(root, name, device_id, features):
    path = root / name
    path.mkdir()
    (path / "device").write_text(f"0x{device_id:04x}\n")
    (path / "features").write_text(features + "\n")


def test_the_reporting_bit_is_read_from_the_balloons_features(tmp_path):
    assert page_reporting.balloon_reporting(str(tmp_path)) is None        # no device
    _device(tmp_path, "virtio1", 0x0002, "1" * 64)                         # a disk
    assert page_reporting.balloon_reporting(str(tmp_path)) is None
    # bits 1 (stats) and 2 (deflate on OOM) only
    _device(tmp_path, "virtio0", 0x0005, "0110000" + "0" * 57)
    assert page_reporting.balloon_reporting(str(tmp_path)) is False
    other = tmp_path / "other"
    other.mkdir()
    # bits 1, 2 and 5 (reporting), as on the Firecracker VMs these notes were taken on
    _device(other, "virtio0", 0x0005, "0110010" + "0" * 57)
    assert page_reporting.balloon_reporting(str(other)) is True


def test_the_table_has_a_row_per_page_kind_and_gap(capsys):
    page_reporting.main(["--size_mb=16", "--gaps=0,0.05", "--rounds=2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("16 MB per touch, 2 rounds; virtio balloon free page reporting:")
    rows = [line.strip("|").split("|") for line in out[3:]]
    assert [(kind.strip(), gap.strip()) for kind, gap, _, _ in rows] == [
        ("huge", "0"), ("huge", "0.05"), ("small", "0"), ("small", "0.05")]
    for _, _, seconds, ratio in rows:
        assert float(seconds) > 0 and ratio.strip().endswith("x")
    assert [ratio.strip() for _, gap, _, ratio in rows if gap.strip() == "0"] == ["1.00x"] * 2


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        page_reporting.main(["--size_mb=0"])
    with pytest.raises(SystemExit):
        page_reporting.main(["--gaps=0,-1"])
