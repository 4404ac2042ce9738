"""The model class of this folder, taken from the installed if-diffusers package (pip install if-diffusers).

`model_index.json` names this component's class as ["if_diffusers_model", "<Class>"]: diffusers'
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` imports this file and takes the class from it.
This file holds no model code; if_diffusers' own classes (`if_diffusers.IFPipeline.from_pretrained(folder)`) load
the folder without it and without trust_remote_code.
"""

try:
    from if_diffusers import *  # noqa: F403  (every public class: the one model_index.json names is among them)
except ModuleNotFoundError as error:
    if error.name != "if_diffusers":
        raise
    raise ImportError("This pipeline folder needs the if-diffusers package: pip install if-diffusers") from error


def __getattr__(name):
    import if_diffusers

    raise AttributeError(
        f"if_diffusers {if_diffusers.__version__} has no {name!r}, which this folder names: "
        "pip install -U if-diffusers"
    )
