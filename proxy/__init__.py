"""dicom-auth-proxy: a local authenticating, streaming proxy for the Azure DICOM service."""

__version__ = "0.1.0"
