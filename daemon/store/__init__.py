"""Storage: peewee models, connections per mode, and versioned migrations."""
