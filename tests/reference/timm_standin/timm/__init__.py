"""A stand-in for the corner of timm that MobileSAM's TinyViT imports (see ../README.md)."""
