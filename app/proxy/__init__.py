"""`leasehold proxy`: brokered access to static secrets (PRODUCT.md "Brokered access").

paths.py cleans and matches request paths, redact.py keeps the secret out of
answers, state.py knows credentials (ledger reads, notifications) and writes the
audit, server.py is the ASGI app.
"""
