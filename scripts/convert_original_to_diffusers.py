"""Convert a DeepFloyd IF checkpoint folder (config.yml + pytorch_model.bin/model.safetensors) to the Hugging Face
hub layout, ready to upload: model card, checksum manifest and, with --validate, a one-step run of the folder. The
same as `if-diffusers convert`; a thin front-end over `if_diffusers.conversion.command_line`.

    python scripts/convert_original_to_diffusers.py --checkpoint IF-I-XL-v1.0 --output IF-I-XL-diffusers \\
        --variant fp16 --text-encoder t5-v1_1-xxl --tokenizer t5-v1_1-xxl --validate
    python scripts/convert_original_to_diffusers.py --output IF-I-XL-diffusers --variant fp16 --validate
"""

import sys

from if_diffusers.conversion.command_line import main

if __name__ == "__main__":
    sys.exit(main())
