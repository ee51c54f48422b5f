"""What the tests share, by concern; ``tests/conftest.py`` registers it all.

* :mod:`.servers` -- the Redis server of the test session and clients of it;
* :mod:`.databases` -- the test database, its tables, and its asyncio engine;
* :mod:`.flavours` -- the sync and asyncio flavours, and the session drivers that give an
  AsyncSession a Session's synchronous face;
* :mod:`.docs` -- running the examples of the README and the docs;
* :mod:`.inspection` -- what the log and Redis hold after a test;
* :mod:`.stores` -- the token stores under the store contract (``test_store_contract.py``),
  each kind behind one synchronous face.
"""
