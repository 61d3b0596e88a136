"""Kanji drawn by Japanese typefaces: a many-class, few-images-per-class image folder.

    python experiments/kanji/make_kanji.py --out=/tmp/kanji
    python experiments/kanji/make_kanji.py --out=DIR [--fonts=8] [--classes=2000] [--size=128]
                                           [--seed=0] [--all] [--cache=~/.cache/gl_jax/fonts]

One class per CJK Unified Ideograph (U+4E00..U+9FFF), one image per typeface:
`DIR/U+XXXX/<font>.png`, the layout `configs/image_folder.py` reads (one folder per class;
`DIR/README.txt` and `DIR/.kanji_params.json` are ignored by the loader). The typefaces are
the first `--fonts` of `FONTS`, each the weight-400 normal style of an npm `@fontsource/*`
package at a pinned version, fetched once with `npm pack` into the cache folder (only the
CSS, the licence and the woff2 subset files that hold ideographs are kept). Fontsource
splits a CJK font into ~120 woff2 subsets by unicode range; the package's 400.css maps each
subset to its range, so a character is drawn with the subset file that holds it.

The classes are the common kanji (JIS X 0208 level 1, 2,965 ideographs, read from
Python's euc_jp codec; `--all`: any ideograph) that EVERY chosen font maps in its cmap (to
a glyph other than .notdef) and draws with some ink; sorted by codepoint, and a
`--seed`ed sample of `--classes` of them (0 = all) when more are available: 2,965 for the
default 8 fonts (2,167 for all 25), so 2,000 classes.

Each image: black on white, RGB; the glyph rotated within +-5 degrees, its ink box scaled
to 80% of the side (times 0.9-1.0), centred and shifted by up to 3 px (a 112 centre crop
of 128 never cuts it), all drawn from a hash of (seed, font, codepoint), so typefaces that
share outlines are not pixel-identical. The defaults take about 1.5 minutes on one core
(fetching the 8 fonts ~15 s, the first time; drawing 50-80 s). Rerunning skips the PNGs already there (each is
written atomically); a folder made with other parameters is refused.

Licences: the fonts are SIL OFL 1.1 (Kosugi Maru: Apache 2.0); README.txt lists each
font's version, licence and copyright line. The images are generated, not committed.

Needs node/npm (the first run only) and, for this experiment only (not a gl_jax
dependency), fontTools with brotli to read the woff2 cmaps: `pip install 'fonttools[woff]'`.
Pillow (FreeType with brotli) draws the woff2 files directly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from PIL import Image, ImageDraw, ImageFont

# (fontsource id, pinned version); `--fonts=N` takes the first N, so the most different
# styles come first. All 25 exist on npm and cover all of JIS level 1 but the last two.
FONTS = (
    ("noto-sans-jp", "5.3.0"),          # gothic (sans)
    ("noto-serif-jp", "5.3.0"),         # mincho (serif)
    ("klee-one", "5.3.0"),              # pencil, textbook handwriting
    ("yusei-magic", "5.3.0"),           # marker
    ("dotgothic16", "5.3.0"),           # pixels
    ("hachi-maru-pop", "5.3.0"),        # round pop handwriting
    ("yomogi", "5.3.0"),                # thin pen handwriting
    ("reggae-one", "5.3.0"),            # heavy display
    # --fonts > 8: more of the same styles.
    ("kaisei-decol", "5.3.0"),
    ("zen-maru-gothic", "5.3.0"),
    ("shippori-mincho", "5.3.0"),
    ("mochiy-pop-one", "5.3.0"),
    ("stick", "5.3.0"),
    ("kiwi-maru", "5.3.0"),
    ("rocknroll-one", "5.3.0"),
    ("zen-old-mincho", "5.3.0"),
    ("biz-udpgothic", "5.3.0"),
    ("biz-udpmincho", "5.3.0"),
    ("zen-kaku-gothic-new", "5.3.0"),
    ("kosugi-maru", "5.3.0"),           # Apache 2.0
    ("m-plus-rounded-1c", "5.3.0"),
    ("m-plus-1p", "5.3.0"),
    ("sawarabi-gothic", "5.3.1"),
    ("sawarabi-mincho", "5.2.8"),       # lacks 15 of the 2,965 JIS level-1 kanji
    ("murecho", "5.3.1"),               # 2,168 of them: all 25 fonts share 2,167
)
FIRST, LAST = 0x4E00, 0x9FFF          # CJK Unified Ideographs
WEIGHT, STYLE = "400", "normal"
FILL = 0.8                           # ink box / canvas side, before the 0.9-1.0 jitter
MAX_SHIFT, MAX_ANGLE = 3, 5.0        # px, degrees
PARAMS_FILE = ".kanji_params.json"
POOL = {False: "JIS X 0208 level-1 kanji", True: "CJK Unified Ideographs"}
FORMAT_VERSION = 2                   # bump when the drawing changes


# --------------------------------------------------------------------------- fonts

def parse_unicode_range(text: str) -> list[tuple[int, int]]:
    """CSS `unicode-range` ('U+4e00-4e0f,U+4e1?,U+9fa0') -> inclusive (first, last) pairs."""
    ranges = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        if not part.startswith("U+"):
            raise ValueError(f"bad unicode-range item {part!r}")
        part = part[2:]
        if "?" in part:
            ranges.append((int(part.replace("?", "0"), 16), int(part.replace("?", "F"), 16)))
        elif "-" in part:
            a, b = part.split("-")
            ranges.append((int(a, 16), int(b, 16)))
        else:
            ranges.append((int(part, 16), int(part, 16)))
    return ranges


def parse_font_faces(css: str) -> list[dict]:
    """The @font-face blocks of a fontsource CSS file -> [{style, weight, woff2, ranges}]."""
    faces = []
    for block in re.findall(r"@font-face\s*{([^}]*)}", css):
        props = {}
        for item in block.split(";"):
            if ":" in item:
                key, value = item.split(":", 1)
                props[key.strip().lower()] = value.strip()
        woff2 = re.search(r"url\(\s*['\"]?([^'\")]+\.woff2)['\"]?\s*\)", props.get("src", ""))
        if not woff2:
            continue
        faces.append(dict(style=props.get("font-style", "normal"),
                          weight=props.get("font-weight", "400"),
                          woff2=os.path.normpath(woff2.group(1)),
                          ranges=parse_unicode_range(props.get("unicode-range", "U+0-10FFFF"))))
    return faces


def _ideograph_faces(css: str, font_id: str) -> list[dict]:
    faces = [f for f in parse_font_faces(css) if f["style"] == STYLE and f["weight"] == WEIGHT
             and any(a <= LAST and b >= FIRST for a, b in f["ranges"])]
    if not faces:
        raise ValueError(f"{font_id}: no {WEIGHT} {STYLE} @font-face covers U+4E00..U+9FFF")
    return faces


def fetch_font(font_id: str, version: str, cache: str) -> str:
    """The cached font folder (package.json, LICENSE, 400.css, files/*.woff2); npm on a miss."""
    folder = os.path.join(cache, f"{font_id}-{version}")
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    if shutil.which("npm") is None:
        raise SystemExit(f"{font_id}: not in the cache {cache!r} and npm is not installed")
    os.makedirs(cache, exist_ok=True)
    spec = f"@fontsource/{font_id}@{version}"
    print(f"  fetching {spec} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # A throwaway npm cache: the tarballs (25-80 MB each) are not kept twice.
        run = subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", tmp,
                              "--cache", os.path.join(tmp, "npm-cache")],
                             capture_output=True, text=True)
        tgz = [n for n in os.listdir(tmp) if n.endswith(".tgz")]
        if run.returncode != 0 or not tgz:
            raise SystemExit(f"npm pack {spec} failed:\n{run.stderr.strip()}")
        staging = os.path.join(tmp, "font")
        os.makedirs(os.path.join(staging, "files"))
        with tarfile.open(os.path.join(tmp, tgz[0])) as tar:
            def read(name: str) -> bytes | None:
                try:
                    return tar.extractfile(f"package/{name}").read()
                except KeyError:
                    return None
            css_name = f"{WEIGHT}.css"
            css = read(css_name)
            if css is None:
                css_name, css = "index.css", read("index.css")
            if css is None:
                raise SystemExit(f"{spec}: neither {WEIGHT}.css nor index.css in the package")
            keep = {css_name: css, "package.json": read("package.json"),
                    "metadata.json": read("metadata.json"),
                    "LICENSE": read("LICENSE") or read("LICENSE.md") or b""}
            for face in _ideograph_faces(css.decode(), font_id):
                data = read(face["woff2"])
                if data is None:
                    raise SystemExit(f"{spec}: {face['woff2']} named in {css_name} is missing")
                keep[face["woff2"]] = data
        for name, data in keep.items():
            if data is not None:
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(data)
        with open(os.path.join(staging, "css_name"), "w") as f:
            f.write(css_name)
        open(os.path.join(staging, ".complete"), "w").close()
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder


class Font:
    """One cached typeface: which subset file draws which ideograph, and the drawing."""

    def __init__(self, font_id: str, version: str, cache: str):
        self.id, self.folder = font_id, fetch_font(font_id, version, cache)
        with open(os.path.join(self.folder, "css_name")) as f:
            css_name = f.read().strip()
        with open(os.path.join(self.folder, css_name)) as f:
            faces = _ideograph_faces(f.read(), font_id)
        self.subset_of: dict[int, str] = {}   # codepoint -> woff2 path (first face wins)
        for face in faces:
            path = os.path.join(self.folder, face["woff2"])
            for a, b in face["ranges"]:
                for cp in range(max(a, FIRST), min(b, LAST) + 1):
                    self.subset_of.setdefault(cp, path)
        meta = self._json("metadata.json")
        package = self._json("package.json")
        self.family = meta.get("family", font_id)
        self.version = package.get("version", version)
        licence = meta.get("license", {})
        self.licence = licence.get("type", package.get("license", "?"))
        self.attribution = " ".join(licence.get("attribution", "").split())
        self._faces: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}

    def _json(self, name: str) -> dict:
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def face(self, cp: int, px: int) -> ImageFont.FreeTypeFont:
        key = (self.subset_of[cp], px)
        if key not in self._faces:
            self._faces[key] = ImageFont.truetype(key[0], px)
        return self._faces[key]

    def drawable(self) -> set[int]:
        """Ideographs in the cmap (not .notdef) whose glyph has ink; cached in the folder."""
        cache = os.path.join(self.folder, f"drawable-{FIRST:x}-{LAST:x}.json")
        if os.path.isfile(cache):
            with open(cache) as f:
                return set(json.load(f))
        try:
            from fontTools.ttLib import TTFont
        except ImportError:
            raise SystemExit("fontTools is needed to read the woff2 cmaps (experiment-only): "
                             "pip install 'fonttools[woff]'") from None
        by_file: dict[str, list[int]] = {}
        for cp, path in self.subset_of.items():
            by_file.setdefault(path, []).append(cp)
        found = []
        for path, cps in sorted(by_file.items()):
            cmap = TTFont(path, lazy=True).getBestCmap() or {}
            for cp in cps:
                if cmap.get(cp, ".notdef") != ".notdef" and self.has_ink(cp):
                    found.append(cp)
        found.sort()
        tmp = f"{cache}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(found, f)
        os.replace(tmp, cache)
        return set(found)

    def has_ink(self, cp: int, px: int = 32) -> bool:
        return self.face(cp, px).getmask(chr(cp)).getbbox() is not None

    def draw(self, cp: int, size: int, seed: int) -> Image.Image:
        """The glyph, black on white, RGB size x size: ink box ~80% of the side, jittered.

        Rotated first (at twice the resolution), so the ink box scaled to `FILL` x `scale` of
        the side is the rotated glyph's: a `size - 16` centre crop never cuts it.
        """
        rng = random.Random(int.from_bytes(hashlib.sha256(
            f"{seed}:{self.id}:{cp:X}".encode()).digest()[:8], "big"))
        scale = rng.uniform(0.9, 1.0)
        angle = rng.uniform(-MAX_ANGLE, MAX_ANGLE)
        dx, dy = rng.randint(-MAX_SHIFT, MAX_SHIFT), rng.randint(-MAX_SHIFT, MAX_SHIFT)
        # Ink mask at twice the target resolution, rotated, cropped to the ink, scaled down.
        px = 2 * size
        face = self.face(cp, px)
        left, top, right, bottom = face.getbbox(chr(cp))
        mask = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(mask).text((2 - left, 2 - top), chr(cp), font=face, fill=255)
        mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
        box = mask.getbbox()
        if box is None:
            raise ValueError(f"{self.id}: U+{cp:04X} draws nothing")
        mask = mask.crop(box)
        k = FILL * size * scale / max(mask.size)
        w, h = max(1, round(mask.width * k)), max(1, round(mask.height * k))
        mask = mask.resize((w, h), Image.Resampling.LANCZOS)
        canvas = Image.new("L", (size, size), 0)
        cx, cy = size / 2 + dx, size / 2 + dy
        canvas.paste(mask, (round(cx - w / 2), round(cy - h / 2)))
        return Image.eval(canvas, lambda v: 255 - v).convert("RGB")


# --------------------------------------------------------------------------- dataset

def jis_level1(cp: int) -> bool:
    """In JIS X 0208 level 1 (EUC-JP lead byte 0xB0..0xCF): the 2,965 common kanji."""
    try:
        code = chr(cp).encode("euc_jp")
    except UnicodeEncodeError:
        return False
    return len(code) == 2 and 0xB0 <= code[0] <= 0xCF


def choose_classes(fonts: list[Font], classes: int, seed: int,
                   every_ideograph: bool = False) -> tuple[list[int], int]:
    """(chosen codepoints sorted, size of the pool: drawable by every font [and JIS level 1])."""
    common = set.intersection(*(f.drawable() for f in fonts))
    if not every_ideograph:
        common = {cp for cp in common if jis_level1(cp)}
    pool = sorted(common)
    if classes and len(pool) > classes:
        pool = sorted(random.Random(seed).sample(pool, classes))
    return pool, len(common)


def save_atomic(image: Image.Image, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def check_params(out: str, params: dict) -> None:
    """A folder made with other parameters is refused (resuming would mix two datasets)."""
    path = os.path.join(out, PARAMS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != params:
            raise SystemExit(f"{out} was made with other parameters:\n  {old}\nnow:\n  {params}\n"
                             "use another --out (or delete the folder).")
        return
    os.makedirs(out, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(params, f, indent=1)
    os.replace(tmp, path)


def write_readme(out: str, fonts: list[Font], chosen: list[int], common: int, args) -> None:
    lines = [
        "Kanji drawn by Japanese typefaces (gl_jax experiments/kanji/make_kanji.py).",
        "",
        f"  python experiments/kanji/make_kanji.py --out={out} --fonts={len(fonts)} "
        f"--classes={args.classes} --size={args.size} --seed={args.seed}"
        + (" --all" if args.all else ""),
        "",
        f"{len(chosen)} classes ({POOL[args.all]} drawable by all {len(fonts)} fonts: "
        f"{common}; " + ("all of them" if len(chosen) == common else
                         f"a seed-{args.seed} sample") + ")",
        f"x {len(fonts)} typefaces = {len(chosen) * len(fonts)} images, "
        f"{args.size} x {args.size} RGB PNG, black on white.",
        "Layout: U+XXXX/<font>.png (one folder per class).",
        "",
        "Fonts (npm @fontsource packages, weight 400 normal):",
    ]
    for f in fonts:
        lines.append(f"  {f.id}: {f.family} {f.version}, licence {f.licence}")
        if f.attribution:
            lines.append(f"      {f.attribution}")
    lines += ["", "The fonts' licences (OFL 1.1 / Apache 2.0) come with the npm packages; "
              "the images are generated, not committed."]
    tmp = os.path.join(out, f".README.txt.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "README.txt"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--fonts", type=int, default=8, help=f"the first N of {len(FONTS)}")
    parser.add_argument("--classes", type=int, default=2000, help="0 = every common one")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all", action="store_true",
                        help="pool every shared ideograph, not only the JIS level-1 kanji")
    parser.add_argument("--cache", default=os.path.join("~", ".cache", "gl_jax", "fonts"))
    args = parser.parse_args(argv)
    if not 1 <= args.fonts <= len(FONTS):
        parser.error(f"--fonts must be in [1, {len(FONTS)}]")
    if args.classes < 0 or args.size < 16:
        parser.error("--classes must be >= 0 and --size >= 16")
    start = time.time()
    out, cache = os.path.expanduser(args.out), os.path.expanduser(args.cache)
    print(f"fonts: {', '.join(i for i, _ in FONTS[:args.fonts])} (cache {cache})", flush=True)
    fonts = [Font(i, v, cache) for i, v in FONTS[:args.fonts]]
    chosen, common = choose_classes(fonts, args.classes, args.seed, args.all)
    if not chosen:
        raise SystemExit("no ideograph is drawable by every chosen font")
    print(f"{common} {POOL[args.all]} drawable by all {len(fonts)} fonts; {len(chosen)} classes "
          f"({time.time() - start:.1f} s)", flush=True)
    check_params(out, dict(format=FORMAT_VERSION, fonts=[f"{f.id}@{f.version}" for f in fonts],
                           classes=args.classes, size=args.size, seed=args.seed,
                           all=args.all))
    written = skipped = 0
    for n, cp in enumerate(chosen, start=1):
        folder = os.path.join(out, f"U+{cp:04X}")
        os.makedirs(folder, exist_ok=True)
        for font in fonts:
            path = os.path.join(folder, f"{font.id}.png")
            if os.path.exists(path):
                skipped += 1
                continue
            save_atomic(font.draw(cp, args.size, args.seed), path)
            written += 1
        if n % 250 == 0 or n == len(chosen):
            print(f"  {n}/{len(chosen)} classes, {written} written, {skipped} already there "
                  f"({time.time() - start:.1f} s)", flush=True)
    write_readme(out, fonts, chosen, common, args)
    print(f"{len(chosen)} classes x {len(fonts)} fonts in {out}: {written} images written, "
          f"{skipped} kept; total {time.time() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
