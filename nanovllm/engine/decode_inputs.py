import torch


class DecodeInputs:
    """A decode batch's inputs as views of one int64 buffer, so that the host fills one pinned array and a step
    costs one copy to the GPU. With CUDA graphs the buffer is the graphs' static input, copied into directly."""
    NUM_FIELDS = 6

    def __init__(self, buffer: torch.Tensor, rows: int, width: int):
        self.buffer, self.rows, self.width = buffer, rows, width
        fields = buffer[:self.NUM_FIELDS * rows].view(self.NUM_FIELDS, rows)
        self.input_ids, self.sample_rows, self.positions, self.slot_mapping, self.context_lens, temperatures = fields
        self.temperatures = temperatures.view(torch.float64)
        self.block_tables = buffer[self.NUM_FIELDS * rows:].view(rows, width)

    @classmethod
    def empty(cls, rows: int, width: int, device: torch.device, pin_memory: bool = False) -> "DecodeInputs":
        buffer = torch.empty(rows * (cls.NUM_FIELDS + width), dtype=torch.int64, device=device, pin_memory=pin_memory)
        return cls(buffer, rows, width)
