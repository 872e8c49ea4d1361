"""Transports: thin drivers that move bytes between sockets and the core.

* ``blocking``: one thread per connection, standard library only.
* ``selectors``: one thread, non-blocking sockets, TLS through ``ssl.MemoryBIO``.
* ``anyio``: asyncio or trio; storage and password hashing in worker threads.

The one rule every transport follows: after any call into a Connection,
write out ``conn.data_to_send()``.  Run them as ``python -m
pop3proto.transports.NAME`` (never by file path: ``anyio.py`` and
``selectors.py`` would shadow the real packages).  This package imports
nothing, so ``import pop3proto`` never needs anyio.
"""
