"""Rollback: undo what a run did before its commit point (`Activate`) when a step fails
(rather than the process dying).

Invariant: the header goes back to the bytes of the backup taken before the first header
change, and only the pending key *this* run wrote is withdrawn from Vault — and only when
its keyslot is not in the header (a Vault copy a keyslot uses is never removed).

Crash windows: dying during rollback leaves a state a re-run resumes from, like dying
during the step that failed: the backup file stays until a later run removes it.
"""

from __future__ import annotations

import logging

from bootkey import luks
from bootkey.enroll.run import Run, with_keys
from bootkey_core.errors import BootkeyError

log = logging.getLogger(__name__)


def rollback(run: Run, cause: BaseException) -> None:
    """Undo what this run did before its commit point. Never raises: the original error
    is what the operator needs; rollback trouble is logged and the state stays
    resumable (re-running plans from what is there)."""
    try:
        if run.restorable and run.backup is not None and run.backup.exists():
            luks.header_restore(run.device, run.backup)
            run.log.append("rollback: header restored")
            run.backup.unlink(missing_ok=True)
        if run.withdraw is not None:
            keyslot, created = run.withdraw
            present = keyslot in luks.inspect(run.device).keyslots \
                if luks.probe_magic(run.device) == 2 else False
            if not present:
                cur, version = run.read()
                if cur is not None:
                    keys = [k for k in cur.keys
                            if not (k.keyslot == keyslot and k.state == "pending")]
                    if not keys and created:
                        run.session.kv_delete(run.loc.kv_mount, run.loc.kv_version,
                                              run.loc.path)
                    elif keys != cur.keys:
                        run.write(with_keys(cur, keys), version)
                run.log.append(f"rollback: withdrew pending key of keyslot {keyslot}")
    except (BootkeyError, OSError) as e:
        log.error("%s: rollback after %s incomplete: %s — re-run the command to resume",
                  run.device, type(cause).__name__, e)

