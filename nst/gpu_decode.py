"""Labelling from raw JPEG bytes decoded in batches on the model's device: on CUDA one batched nvJPEG call per batch
(TorchCodec's `decode_jpeg(list_of_bytes, device=...)`), elsewhere the same call decoding on the CPU, which is how CI
runs this path (tests/test_gpu_paths.py, against nst.train.predict_logits). The label stage takes it on CUDA
(`pseudo_label.gpu_decode`).

One CPU process decodes and resizes a 320 px JPEG at ~355 images/s, a data-centre GPU labels ~10,000 images/s:
with CPU decoding the GPU would mostly wait. Here workers only read file bytes (and check the header against the
pixel limit); decoding, resizing and cropping happen on the device in batches. Files whose pixels the batched
decoder would not give as nst.data.decode_bytes does are decoded on the CPU in the workers by decode_bytes itself.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from nst.data import PLAIN_MODES, Blobs, Loader, decode_bytes, eval_resize, host_to_device, open_image, to_device

_EXIF_ORIENTATION = 0x0112


class EncodedFiles(Dataset):
    """8-bit RGB and grey JPEGs (by their header, not their name) as their raw bytes, decoded later on the device;
    anything else decoded to uint8 RGB and resized on the CPU by nst.data.decode_bytes: CMYK JPEGs, and JPEGs with
    an EXIF orientation, which TorchCodec applies and no other decode here does (an image must not be labelled
    turned from the way it is trained and evaluated)."""

    def __init__(self, paths: list[str] | Blobs, data_cfg):
        self.blobs = Blobs.of(paths)
        self.cfg = data_cfg

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        path, data = self.blobs.name(i), self.blobs.read(i)
        im = open_image(data, path, self.cfg.max_image_pixels)
        if im.format == "JPEG" and im.mode in PLAIN_MODES and im.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True
        img = decode_bytes(data, path, self.cfg.max_image_pixels)
        return eval_resize(img, self.cfg.image_size, self.cfg.transform, self.cfg.crop_pct), False


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 3×H×W RGB per JPEG, on `device`: the only step that differs by device (nvJPEG, batched, on CUDA;
    libjpeg-turbo on the CPU, the same pixels as torchvision's decoder there)."""
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(encoded, mode="RGB", device=device) if encoded else []


def predict_logits_from_bytes(model, paths: list[str] | Blobs, data_cfg, device: torch.device, batch_size: int, workers: int,
                              *, amp: bool | str, channels_last: bool) -> torch.Tensor:
    model.eval()
    if channels_last:  # before inference mode (see nst.train.predict_logits)
        model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _predict(model, paths, data_cfg, device, batch_size, workers, amp, channels_last)


def _predict(model, paths, data_cfg, device, batch_size, workers, amp, channels_last) -> torch.Tensor:
    from nst.train import amp_on

    loader = Loader(EncodedFiles(paths, data_cfg), batch_size=batch_size, num_workers=workers,
                    collate_fn=lambda b: b, persistent_workers=False, prefetch_factor=4 if workers else None)
    use_amp = amp_on(amp, device)
    out = []
    for batch in loader:
        decoded = iter(decode_jpegs([t for t, is_jpeg in batch if is_jpeg], device))
        imgs = []
        for t, is_jpeg in batch:
            if is_jpeg:
                imgs.append(eval_resize(next(decoded), data_cfg.image_size, data_cfg.transform, data_cfg.crop_pct))
            else:
                imgs.append(host_to_device(t, device))
        x = to_device(torch.stack(imgs), device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out.append(model(x).float())  # kept on the device: one copy to the host at the end, no wait per batch
    return torch.cat(out).cpu() if out else torch.empty(0)
