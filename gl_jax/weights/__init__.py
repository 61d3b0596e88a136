"""PyTorch weights into gl_jax models, without torch and without running pickled code.

    from gl_jax.weights import load_state_dict, build_converted_model, save_converted
    state_dict = load_state_dict("resnet50-0676ba61.pth")       # name -> np.ndarray
    model, report = build_converted_model("resnet50", state_dict)
    save_converted(model, "weights/resnet50", arch="resnet50", source="resnet50-0676ba61.pth")

    # in training (config.model.init_from = "weights/resnet50"):
    from gl_jax.weights import load_pretrained
    load_pretrained(model_with_100_classes, "weights/resnet50", arch="resnet50")

Modules: `torch_reader` (the safe reader), `convert` (name and layout mapping, the
mismatch report), `pretrained` (Orbax save/load, the EfficientNet-Lite0 package file).
"""
from gl_jax.weights.convert import (ARCHITECTURES, ArchitectureRule, ConversionReport,
                                    convert_state_dict, torch_key_map)
from gl_jax.weights.pretrained import (FORMAT, LoadReport, build_converted_model,
                                       check_output_directory, converted_efficientnet_lite0,
                                       efficientnet_lite0_file, load_pretrained, read_metadata,
                                       save_converted)
from gl_jax.weights.torch_reader import UnsafeCheckpointError, load_state_dict, read_torch_file

__all__ = ["ARCHITECTURES", "ArchitectureRule", "ConversionReport", "FORMAT", "LoadReport",
           "UnsafeCheckpointError", "build_converted_model", "check_output_directory",
           "convert_state_dict",
           "converted_efficientnet_lite0",
           "efficientnet_lite0_file", "load_pretrained", "load_state_dict", "read_metadata",
           "read_torch_file", "save_converted", "torch_key_map"]
