"""Every config file loads, with and without `:quick`, and names things that exist."""
import importlib

import pytest

from gl_jax import data, models
from gl_jax.losses import registry

CONFIGS = ["omniglot", "digits", "image_folder", "cub200", "cars196", "sop", "inshop", "market1501",
           "dukemtmc"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_loads_and_names_known_pieces(name, arg):
    module = importlib.import_module(f"configs.{name}")
    assert "python -m gl_jax.main" in module.__doc__
    config = module.get_config(arg)
    assert config.data.name in data.DATASETS
    assert config.model.name in models.available_models()
    registry.hparams_from_config(config.loss)
    assert len(config.schedule.lr_drop_epochs) == len(config.schedule.lr_drop_factors)
    if arg == "quick":
        assert config.schedule.steps_per_epoch > 0 or config.data.name == "digits"


def test_image_folder_many_classes_is_the_studys_chosen_recipe():
    """configs/image_folder.py:many_classes sets what experiments/finetune/study.py chose."""
    from gl_jax import sweep
    module = importlib.import_module("configs.image_folder")
    config = module.get_config("many_classes")
    study = sweep.load_module("experiments/finetune/study.py")
    for dotted, value in study.CHOSEN.items():
        section, field = dotted.split(".")
        assert config[section][field] == value, dotted
    reference = study.get_config()
    for dotted in ("model.name", "model.embedding_dim", "data.image_size", "data.resize_size",
                   "sampler.classes_per_batch", "sampler.samples_per_class"):
        section, field = dotted.split(".")
        assert config[section][field] == reference[section][field], dotted


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_config_argument_is_refused(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="quick"):
        module.get_config("fast")
