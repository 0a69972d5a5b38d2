"""What `bootkey` and `kes` both stand on: errors, locked memory, durations.

The layer exists so the two packages do not import each other both ways: `bootkey`
(the agent and CLI) may import `kes`, `kes` may import only `bootkey_core`, and this
package imports neither (tests/test_import_rules.py checks it).
"""

__version__ = "0.1.0"
