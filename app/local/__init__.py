"""`leasehold up` on one machine: the embedded system and an OpenBao dev server."""
