"""Where the DALI pipelines' stages run (decoding, augmentation, the normalised output), and the
rules a placement must keep. Plain Python, no DALI: the config and the benchmarks check a
placement before anything is built."""
from typing import NamedTuple, Optional


class Placement(NamedTuple):
    """Which stages run on the GPU. A later stage is never on the CPU when an earlier one is on
    the GPU (DALI moves data to the GPU only). hw_load: the share of JPEGs the GPU decoder hands
    to the card's hardware JPEG engine (DALI's hw_decoder_load; None: DALI's default, 0.65)."""
    decode: bool
    augment: bool
    output: bool
    hw_load: Optional[float] = None


DEVICES = ("gpu", "cpu")
# decoding may also be done once, at the start, into host memory (see data/decode_once.py):
# to the later stages that is CPU-decoded data
DECODE_DEVICES = DEVICES + ("once",)


def placement(gpu, decode_device="gpu", augment_device="gpu", hw_decoder_load=None) -> Placement:
    """The stages' placement for a pipeline feeding the GPU (`gpu`) or the CPU; on the CPU
    everything runs there, whatever the devices asked for. ValueError naming the setting for a
    placement DALI cannot run."""
    for name, value, allowed in (("decode_device", decode_device, DECODE_DEVICES),
                                 ("augment_device", augment_device, DEVICES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if decode_device == "gpu" and augment_device == "cpu":
        raise ValueError("augment_device=cpu needs decode_device=cpu (DALI cannot bring GPU "
                         "images back to the CPU stages)")
    if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
    return Placement(gpu and decode_device == "gpu", gpu and augment_device == "gpu", bool(gpu),
                     float(hw_decoder_load) if hw_decoder_load is not None else None)
