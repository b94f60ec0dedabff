"""Graph mapping: capture a UNet with torch.export and read its structure off the graph."""

from unet_surgery.graph.mapper import map_unet
from unet_surgery.graph.records import AttentionRecord, ConvRecord, SkipRecord, UNetMap

__all__ = ["AttentionRecord", "ConvRecord", "SkipRecord", "UNetMap", "map_unet"]
