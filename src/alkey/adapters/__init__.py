"""alkey's keys in the caching libraries applications already use: one module each.

Caching decorators build their keys from ``str()`` or ``repr()`` of the arguments, and a
model instance's text is not its row's version: it holds its primary key (a value cached
before a write is served after it) or a memory address (every load misses). Each module
here gives a library keys made by alkey instead -- changed by a commit of the rows they
name, and including the instances' loaded state, so a value computed from data loaded
before a concurrent commit is never served to a reader of the new data:

* :mod:`alkey.adapters.dogpile` -- ``function_key_generator`` and
  ``function_multi_key_generator`` for dogpile.cache's ``cache_on_arguments()`` and
  ``cache_multi_on_arguments()`` (``pip install 'alkey[dogpile]'``);
* :mod:`alkey.adapters.flask_caching` -- ``make_cache_key`` for Flask-Caching's
  ``@cache.cached()``, and ``memoize`` for functions that take model instances
  (``alkey[flask-caching]``);
* :mod:`alkey.adapters.aiocache` and :mod:`alkey.adapters.cashews` -- a ``cached``
  decorator that awaits an alkey key, which those libraries' own decorators cannot
  (their key builders are synchronous) (``alkey[aiocache]``, ``alkey[cashews]``).

Each module imports its library, and only it does: importing :mod:`alkey` or
:mod:`alkey.readthrough` imports none of them (:func:`alkey.readthrough.get_or_create`
recognises their caches by what they have).
"""
