"""Site data: validate and load a site folder, split it into train and held-out."""

from fedgen.data.site import (
    IMAGE_SUFFIXES,
    SiteCheck,
    SiteData,
    check_site,
    image_splits,
    load_images,
    load_site,
    split_indices,
    text_splits,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SiteCheck",
    "SiteData",
    "check_site",
    "load_site",
    "split_indices",
    "load_images",
    "image_splits",
    "text_splits",
]
