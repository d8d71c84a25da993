"""Labelling on CUDA with JPEG decoding on the GPU (nvjpeg through `torchvision.io.decode_jpeg(device="cuda")`).

One CPU process decodes and resizes a 320 px JPEG at ~355 images/s, a data-centre GPU labels ~10,000 images/s:
with CPU decoding the GPU would mostly wait. Here workers only read file bytes (and check the header against the
pixel limit); decoding, resizing and cropping happen on the GPU in batches. Files that are not JPEGs fall back to
CPU decoding in the workers. Not exercised by CI (no GPU there); the CPU path is `nst.train.predict_logits`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from nst.data import JPEG_EXTS, check_pixels, decode_bytes, eval_resize, header_size, read_bytes, to_device


class EncodedFiles(Dataset):
    """JPEGs as their raw bytes (decoded later, on the GPU); anything else decoded and resized on the CPU."""

    def __init__(self, paths: list[str], data_cfg):
        self.paths, self.cfg = paths, data_cfg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        data = read_bytes(path)
        if Path(path).suffix.lower() in JPEG_EXTS:
            check_pixels(*header_size(data, path), self.cfg.max_image_pixels, path)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True
        img = decode_bytes(data, path, self.cfg.max_image_pixels)
        return eval_resize(img, self.cfg.image_size, self.cfg.transform, self.cfg.crop_pct), False


def predict_logits_gpu_decode(model, paths: list[str], data_cfg, device: torch.device, batch_size: int, workers: int,
                              *, amp: bool, channels_last: bool) -> torch.Tensor:
    model.eval()
    if channels_last:  # before inference mode (see nst.train.predict_logits)
        model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _predict(model, paths, data_cfg, device, batch_size, workers, amp, channels_last)


def _predict(model, paths, data_cfg, device, batch_size, workers, amp, channels_last) -> torch.Tensor:
    import torchvision.io as tvio

    loader = DataLoader(EncodedFiles(paths, data_cfg), batch_size=batch_size, num_workers=workers,
                        collate_fn=lambda b: b, persistent_workers=False, prefetch_factor=4 if workers else None)
    out = []
    for batch in loader:
        encoded = [t for t, is_jpeg in batch if is_jpeg]
        decoded = iter(tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.RGB, device=device) if encoded else [])
        imgs = []
        for t, is_jpeg in batch:
            img = next(decoded) if is_jpeg else t.to(device, non_blocking=True)
            if is_jpeg:
                img = eval_resize(img, data_cfg.image_size, data_cfg.transform, data_cfg.crop_pct)
            imgs.append(img)
        x = to_device(torch.stack(imgs), device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)
