"""Fine-tune a stage I or II IF pipeline on captioned images; the same options as `if-diffusers train`.

    python scripts/train.py --model IF-I-M-diffusers --stage I --train-data my-images --resolution 64 \\
        --output-dir runs/mine --max-train-steps 2000
    accelerate launch --num_processes 4 scripts/train.py ...   (several GPUs, no code change)
"""

import sys

from if_diffusers.training.command_line import main

if __name__ == "__main__":
    sys.exit(main())
