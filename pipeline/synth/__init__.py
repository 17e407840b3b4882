"""Synthetic CAMELYON16-format cohorts: H&E-like pyramidal TIFFs with ASAP XML lesions."""
