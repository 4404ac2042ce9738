"""Batch generation (`if-diffusers batch`): a prompt file (`prompt_file`) -> image jobs, each a function of its
prompt, seed and settings (`jobs`) -> an `imagefolder` dataset written image by image, resumable (`image_folder`),
on every process accelerate starts (`runner`)."""
