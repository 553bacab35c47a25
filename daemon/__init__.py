"""campaignd: a self-supervising daemon for WhatsApp outreach campaigns."""

__version__ = "0.1.0"
