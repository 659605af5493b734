import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list or array -> device tensor; through pinned memory on CUDA so the copy is asynchronous."""
    tensor = torch.as_tensor(data, dtype=dtype)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
