"""The pure core: codecs, frames, block planning, the register image. No I/O."""
