"""`bootkey doctor`'s verdicts: pure functions from observed facts to `Check`s.

Each function takes values (an HTTP status, a token's lookup-self data, the text of
/etc/fstab, …) and returns pass, warn or fail with a detail and the fix. Nothing here
does I/O; bootkey.doctor gathers the facts.

Invariant: a `fail` is something that stops bootkey from unlocking at boot or from
keeping its Vault access; a `warn` works today but is fragile or unusual. Every
non-pass result names the setting, file or path to change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from bootkey import crypttab
from bootkey_core.duration import format_duration as dur


class Status(Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "fix": self.fix}


# ---- Vault ----------------------------------------------------------------------------

# Vault's /sys/health answers: 200 active, 429 standby, 472/473 DR/perf standby,
# 501 uninitialised, 503 sealed (Vault API docs, sys/health).
_HEALTH = {200: "active", 429: "standby", 472: "DR secondary", 473: "performance standby"}


def reachable(address: str, status: int | None, error: str | None) -> Check:
    name = f"vault {address}"
    if status is None:
        return Check(name, Status.FAIL, f"unreachable: {error}",
                     "check [vault] address, the network and the firewall")
    if status in _HEALTH:
        return Check(name, Status.PASS, f"reachable, {_HEALTH[status]}")
    if status == 503:
        return Check(name, Status.FAIL, "sealed (503)", "unseal Vault (`bao operator unseal`)")
    if status == 501:
        return Check(name, Status.FAIL, "not initialised (501)", "initialise and unseal Vault")
    return Check(name, Status.FAIL, f"sys/health answered {status}",
                 "check that [vault] address is a Vault/OpenBao server")


def tls_failed(address: str, ca_file: str | None, error: str) -> Check:
    """A TLS handshake or verification failure against `address`."""
    if ca_file:
        return Check(f"vault {address}", Status.FAIL,
                     f"TLS: the server's certificate does not verify against the CA file "
                     f"{ca_file} ({error})",
                     f"set [vault] ca_file to the CA that issued Vault's certificate "
                     f"({ca_file} did not)")
    return Check(f"vault {address}", Status.FAIL,
                 f"TLS: the server's certificate does not verify against the system trust "
                 f"store ({error})",
                 "set [vault] ca_file to the CA that issued Vault's certificate")


def failover(checks: Sequence[Check]) -> list[Check]:
    """Per-address verdicts for a Vault with several addresses: while one answers,
    bootkey fails over to it, so the others' failures are warnings."""
    if not any(c.status is Status.PASS for c in checks):
        return list(checks)
    return [Check(c.name, Status.WARN, f"{c.detail} (another address answers: fail-over "
                  "has one server less)", c.fix) if c.status is Status.FAIL else c
            for c in checks]


def not_tls(address: str) -> Check:
    return Check(f"vault {address}", Status.FAIL, "TLS: the server does not speak TLS",
                 "use http:// in [vault] address, or enable TLS on the Vault listener")


def ca_unreadable(address: str, ca_file: str, error: str) -> Check:
    return Check(f"vault {address}", Status.FAIL,
                 f"TLS: cannot use the CA file {ca_file}: {error}",
                 "set [vault] ca_file to a readable PEM file")


# Vault's `Date` header has one-second resolution; token TTLs and TLS validity are
# judged by Vault's clock, so a skew beyond a few seconds is worth a word.
SKEW_WARN = 30.0
SKEW_FAIL = 300.0


def clock_skew(skew: float | None) -> Check:
    if skew is None:
        return Check("clock", Status.WARN, "Vault sent no Date header: skew not measured")
    a = abs(skew)
    how = f"this host is {a:.0f} s {'ahead of' if skew > 0 else 'behind'} Vault"
    if a <= SKEW_WARN:
        return Check("clock", Status.PASS, f"within {SKEW_WARN:.0f} s of Vault ({skew:+.0f} s)")
    fix = "synchronise the clock (systemd-timesyncd, chrony)"
    return Check("clock", Status.WARN if a <= SKEW_FAIL else Status.FAIL, how, fix)


@dataclass(frozen=True)
class TokenFacts:
    """From auth/token/lookup-self."""

    ttl: float
    period: float  # 0: not periodic
    explicit_max_ttl: float  # 0: none beyond the mount/system maximum
    renewable: bool


def token_facts(data: Mapping[str, object]) -> TokenFacts:
    def num(k: str) -> float:
        v = data.get(k)
        return float(v) if isinstance(v, int | float | str) and str(v).isdigit() else 0.0

    return TokenFacts(num("ttl"), num("period"), num("explicit_max_ttl"),
                      bool(data.get("renewable")))


FIX_PERIODIC = ("set token_period on the AppRole role (`bootkey setup-vault` does: a periodic "
                "token renews for ever)")
FIX_REUSABLE = ("issue a reusable secret_id (`bootkey setup-vault --new-secret-id`; "
                "secret_id_num_uses=0 on the role)")


def token(t: TokenFacts) -> Check:
    if t.ttl == float("inf"):
        return Check("token", Status.PASS, "never expires")
    if t.period > 0 and t.renewable:
        return Check("token", Status.PASS,
                     f"periodic (period {dur(t.period)}, ttl {dur(t.ttl)}): renews for ever")
    if t.renewable:
        limit = f"max TTL {dur(t.explicit_max_ttl)}" if t.explicit_max_ttl else \
            "the mount's max TTL"
        return Check("token", Status.WARN,
                     f"renewable, not periodic (ttl {dur(t.ttl)}, {limit}): the agent must "
                     "log in again when renewal stops", FIX_PERIODIC)
    return Check("token", Status.WARN,
                 f"not renewable (ttl {dur(t.ttl)}): the agent must log in again every "
                 f"{dur(t.ttl)}", FIX_PERIODIC)


def relogin(t: TokenFacts, second_login: str | None, source: str,
            access_until: str | None = None) -> Check:
    """`second_login` is None when a second AppRole login with the same secret_id worked,
    else why it failed. `access_until`: when logging in again stops working (the
    secret_id expires), if the session foresaw it."""
    periodic = t.period > 0 and t.renewable
    if second_login is None:
        if access_until and not periodic:
            return Check("re-login", Status.WARN,
                         f"a second login worked, but logging in again stops at {access_until} "
                         "(the secret_id expires) and the token is not periodic",
                         f"{FIX_PERIODIC}; or a longer secret_id_ttl")
        return Check("re-login", Status.PASS,
                     f"a second login with the same secret_id ({source}) worked")
    if periodic:
        return Check("re-login", Status.WARN,
                     f"a second login failed ({second_login}): the periodic token renews for "
                     "ever, but a restarted agent cannot log in", FIX_REUSABLE)
    return Check("re-login", Status.FAIL,
                 f"a second login failed ({second_login}) and the token is not periodic: "
                 f"the agent loses Vault when the token expires (ttl {dur(t.ttl)})",
                 f"{FIX_PERIODIC}; or {FIX_REUSABLE}")


def capabilities(needed: Sequence[tuple[str, str, str]],
                 have: Mapping[str, Sequence[str]]) -> list[Check]:
    """`needed`: (what, path, capability); `have`: sys/capabilities-self's answer."""
    out = []
    for what, path, cap in needed:
        caps = list(have.get(path) or [])
        if cap in caps or "root" in caps:
            out.append(Check(f"policy {what}", Status.PASS, f"{path}: {cap} allowed"))
        else:
            out.append(Check(f"policy {what}", Status.FAIL,
                             f"{path}: the token lacks `{cap}` (has: {', '.join(caps) or 'none'})",
                             "apply the policy `bootkey policy` prints (bootkey setup-vault "
                             "writes it)"))
    return out


# ---- the host -------------------------------------------------------------------------


def memlock(limit_kib: int | None, mlockall_error: str | None,
            unit_limit: str | None) -> Check:
    """`limit_kib` None means unlimited; `unit_limit` is bootkey.service's LimitMEMLOCK=
    (None: unit not found or not set)."""
    here = "unlimited" if limit_kib is None else f"{limit_kib} KiB"
    if mlockall_error is None:
        return Check("memlock", Status.PASS, f"mlockall works here (RLIMIT_MEMLOCK {here})")
    if unit_limit == "infinity":
        return Check("memlock", Status.WARN,
                     f"mlockall fails in this shell (RLIMIT_MEMLOCK {here}), but "
                     "bootkey.service sets LimitMEMLOCK=infinity, so the agent can lock")
    return Check("memlock", Status.FAIL,
                 f"mlockall fails (RLIMIT_MEMLOCK {here}: {mlockall_error}); keys could be "
                 "swapped to disk",
                 "set LimitMEMLOCK=infinity in bootkey.service (or the shell: ulimit -l "
                 "unlimited)")


def unit_memlock(unit_found: bool, value: str | None) -> Check:
    if not unit_found:
        return Check("unit LimitMEMLOCK", Status.WARN, "bootkey.service not found",
                     "install the package (it ships bootkey.service)")
    if value == "infinity":
        return Check("unit LimitMEMLOCK", Status.PASS, "LimitMEMLOCK=infinity")
    return Check("unit LimitMEMLOCK", Status.FAIL,
                 f"LimitMEMLOCK={value or '(unset)'}: the agent's mlockall will fail",
                 "set LimitMEMLOCK=infinity in bootkey.service (a drop-in under "
                 "/etc/systemd/system/bootkey.service.d/)")


# cryptsetup 2.4 is where LUKS2 token import and `--token-id` handling settled; bootkey's
# tests run on 2.6.
MIN_CRYPTSETUP = (2, 4)


def cryptsetup_version(output: str | None, error: str | None) -> Check:
    if output is None:
        return Check("cryptsetup", Status.FAIL, f"not usable: {error}",
                     "install cryptsetup (apt install cryptsetup-bin)")
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", output)
    if not m:
        return Check("cryptsetup", Status.WARN, f"unknown version: {output.strip()[:60]}")
    ver = (int(m.group(1)), int(m.group(2)))
    if ver < MIN_CRYPTSETUP:
        return Check("cryptsetup", Status.FAIL, f"version {m.group(0)} is too old",
                     f"install cryptsetup ≥ {'.'.join(map(str, MIN_CRYPTSETUP))}")
    return Check("cryptsetup", Status.PASS, f"version {m.group(0)}")


def device_mapper(present: bool) -> Check:
    if present:
        return Check("device-mapper", Status.PASS, "device-mapper is in the kernel")
    return Check("device-mapper", Status.FAIL,
                 "no device-mapper in this kernel (no /sys/class/misc/device-mapper): "
                 "volumes cannot be opened; `bootkey unlock --check` still works",
                 "load dm_mod and dm_crypt (modprobe dm_crypt), or boot a kernel with them")


def unit_enabled(installed: bool, service: bool, socket: bool, mode: str) -> Check:
    if not installed:
        return Check("unit", Status.WARN, "bootkey.service is not installed",
                     "install the package (it ships the units)")
    if service or socket:
        which = " and ".join(n for n, on in (("bootkey.service", service),
                                             ("bootkey-cryptsetup.socket", socket)) if on)
        return Check("unit", Status.PASS, f"{which} enabled")
    unit = "bootkey-cryptsetup.socket" if mode == "socket" else "bootkey.service"
    return Check("unit", Status.FAIL, "neither bootkey.service nor bootkey-cryptsetup.socket "
                 "is enabled: nothing unlocks at boot", f"systemctl enable {unit}")


def _lines(text: str) -> list[list[str]]:
    out = []
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if fields:
            out.append(fields)
    return out


def tab_lines(volumes: Sequence[crypttab.VolumeLike], mode: crypttab.Mode, crypttab_text: str,
              fstab_text: str, opts: crypttab.Options) -> list[Check]:
    """Each bootkey volume's /etc/crypttab and /etc/fstab lines against what
    bootkey.crypttab prints: `_netdev` and `nofail` everywhere, no
    `x-systemd.requires=bootkey.service`, the key socket as keyfile in socket mode."""
    ct = {f[0]: f for f in _lines(crypttab_text) if len(f) >= 2}
    fs = {f[0]: f for f in _lines(fstab_text) if len(f) >= 2}
    must = {"_netdev", "nofail"}
    out: list[Check] = []
    in_initrd = set(initrd_volumes(crypttab_text))
    for vol in volumes:
        name = vol.name
        if name in in_initrd:  # opened before the root is mounted: see initrd_secret_id
            continue
        problems: list[str] = []
        worst = Status.PASS
        line = ct.get(name)
        if mode is crypttab.Mode.SOCKET:
            if line is None:
                problems.append("no /etc/crypttab line")
                worst = Status.FAIL
            else:
                flags = set(line[3].split(",")) if len(line) > 3 else set()
                missing = sorted(must - flags)
                if missing:
                    problems.append(f"/etc/crypttab lacks {', '.join(missing)}")
                    worst = Status.FAIL
                if len(line) < 3 or line[2] != opts.socket_path:
                    problems.append(f"/etc/crypttab keyfile is not {opts.socket_path}")
                    worst = Status.FAIL
        elif line is not None:
            problems.append("an /etc/crypttab line too: systemd-cryptsetup and the agent "
                            "would both open it")
            worst = Status.WARN
        mapped = f"/dev/mapper/{name}"
        fline = fs.get(mapped)
        if fline is not None:
            flags = set(fline[3].split(",")) if len(fline) > 3 else set()
            missing = sorted(must - flags)
            if missing:
                problems.append(f"/etc/fstab line for {mapped} lacks {', '.join(missing)}: "
                                "boot waits on Vault")
                worst = Status.FAIL
            if any(f.startswith("x-systemd.requires=bootkey") for f in flags):
                problems.append("/etc/fstab has x-systemd.requires=bootkey.service: restarting "
                                "bootkey unmounts it")
                worst = Status.FAIL if worst is Status.FAIL else Status.WARN
        if not problems:
            out.append(Check(f"crypttab {name}", Status.PASS,
                             "consistent" if line or fline else "no crypttab/fstab lines"))
        else:
            want = [crypttab.fstab_line(vol, mode, opts)]
            if mode is crypttab.Mode.SOCKET:
                want.insert(0, crypttab.crypttab_line(vol, opts))
            out.append(Check(f"crypttab {name}", worst, "; ".join(problems),
                             "use the lines `bootkey crypttab` prints: " + " | ".join(want)))
    return out


# ---- the root volume in the initrd ---------------------------------------------------

# bootkey.initrd.SOCKET_PATH (not imported: that module pulls in the key socket server)
INITRD_SOCKET = "/run/bootkey/initrd.sock"


def initrd_volumes(crypttab_text: str) -> list[str]:
    """Volumes /etc/crypttab has opened in the initrd by bootkey's dracut module."""
    return [f[0] for f in _lines(crypttab_text) if len(f) >= 3 and f[2] == INITRD_SOCKET]


def initrd_secret_id(volumes: Sequence[str], sealing: str) -> Check | None:
    """The secret_id an initrd carries is readable by whoever holds the disk unless it
    is sealed to the TPM2. `sealing` is bootkey.initrd.secret_id_sealing's line."""
    if not volumes:
        return None
    name = "initrd secret_id"
    which = ", ".join(volumes)
    if sealing.startswith("sealed"):
        return Check(name, Status.PASS, f"{which} in the initrd; {sealing}")
    return Check(name, Status.WARN,
                 f"{which} opened in the initrd, whose secret_id is {sealing}",
                 "seal it to the TPM2 (docs/initrd.md, “The secret_id in the initrd”), then "
                 "rebuild the initrd (dracut --force); without a TPM, bind the secret_id to "
                 "this host's address (secret_id_bound_cidrs)")
