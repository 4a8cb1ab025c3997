"""Test helpers: engines and servers with test settings, independent references, worker hooks.

pytest puts ``tests/`` on ``sys.path`` (the test modules are not a package), so
tests import ``helpers.<module>``; vLLM workers find it through ``PYTHONPATH``
(tests/conftest.py), since methods named ``helpers.selection_hooks:...`` load there.
"""
