"""What the GPU check runs on: the device, torch and CUDA versions, and which fast kernels this install has (the
document-masked attention backends, grouped GEMM for MoE experts). Last line: one JSON object."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: I001 - puts the repository root on sys.path first

import hydra
import torch
import transformers

import models.layers.attention as attention
import models.moe.dispatch as dispatch


def main() -> None:
    info = common.device_info()
    info.update({
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,  # the GPT-2 families need >= 4.53 (masking_utils)
        "hydra": hydra.__version__,
        "torch_varlen_attn": attention.TORCH_VARLEN_AVAILABLE,
        "flash_attn": attention.FLASH_ATTN_AVAILABLE,
        "grouped_mm": dispatch.GROUPED_MM_AVAILABLE,
        "cuda_available": torch.cuda.is_available(),
    })
    for key, value in info.items():
        print(f"{key}: {value}")
    common.emit(info)


if __name__ == "__main__":
    main()
