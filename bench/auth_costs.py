"""What a failed password check and a SCRAM server-first cost, per scheme, for a decoy, and
for long passwords: the figures behind issue 15's findings 3, 5 and 9.

    python bench/auth_costs.py [--reps 20] [--no-libraries]

Prints milliseconds per call (median of ``--reps``) for:

* ``verify`` of a wrong password by each scheme's verifier at its usual cost
  (SHA512-CRYPT and SHA256-CRYPT at 5000 rounds, SCRAM-SHA-256 at 4096
  iterations, bcrypt cost 10, Argon2id with argon2-cffi's defaults, PLAIN),
  and by ``PasswdFile.dummy_verifier()`` over a file that mixes them (it must
  cost what the dearest does);
* ``verify`` with passwords of 64, 1024 (``MAX_PASSWORD_OCTETS``) and 6000
  octets (refused at once);
* the SCRAM keys the facade needs for server-first: a stored SCRAM user, a
  ``{PLAIN}`` user (first call and later calls) and ``decoy_scram`` for an
  unknown name.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pop3proto.auth import MAX_PASSWORD_OCTETS, Verifier
from pop3proto.passwd import PasswdFile, hash_password


def ms(call: Callable[[], object], reps: int) -> float:
    """Median milliseconds of *reps* calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-libraries", action="store_true",
                        help="leave bcrypt and Argon2 out of the file")  # fmt: skip
    args = parser.parse_args()
    reps = args.reps
    schemes: dict[str, int | None] = {
        "PLAIN": None, "SHA512-CRYPT": None, "SHA256-CRYPT": None, "SCRAM-SHA-256": None,
    }  # fmt: skip
    if importlib.util.find_spec("bcrypt") and not args.no_libraries:
        schemes["BLF-CRYPT"] = 10
    if importlib.util.find_spec("argon2") and not args.no_libraries:
        schemes["ARGON2ID"] = None
    lines = [f"{s.lower()}:{hash_password('right-password', s, rounds=r)}" for s, r in
             schemes.items()]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "users")
        path.write_text("\n".join(lines) + "\n")
        auth = PasswdFile(path)
        dummy = auth.dummy_verifier()
        rows: list[tuple[str, float]] = []
        verifiers: dict[str, Verifier] = {}
        for scheme in schemes:
            found = auth.lookup(scheme.lower())
            assert found is not None
            verifiers[scheme] = found[0]
        verifiers[f"dummy (unknown user: {getattr(dummy, 'scheme', type(dummy).__name__)})"] = (
            dummy
        )
        for label, v in verifiers.items():
            cost = ms(lambda v=v: v.verify("wrong"), reps)
            rows.append((f"verify, wrong password: {label}", cost))
        for n in (64, MAX_PASSWORD_OCTETS, 6000):
            for label in ("SHA512-CRYPT", "SHA256-CRYPT", "SCRAM-SHA-256"):
                v = verifiers[label]
                cost = ms(lambda v=v, n=n: v.verify("x" * n), max(3, reps // 4))
                rows.append((f"verify, {n}-octet password: {label}", cost))
        scram_user = verifiers["SCRAM-SHA-256"]
        rows.append(("server-first keys: stored SCRAM user", ms(scram_user.scram, reps)))
        fresh = PasswdFile(path)  # its {PLAIN} user has not derived its keys yet
        found = fresh.lookup("plain")
        assert found is not None
        rows.append(("server-first keys: {PLAIN} user, first exchange", ms(found[0].scram, 1)))
        rows.append(("server-first keys: {PLAIN} user, later exchanges", ms(found[0].scram, reps)))
        names = iter(f"nobody{i}" for i in range(10**6))
        rows.append(("server-first keys: decoy for an unknown name",
                     ms(lambda: auth.decoy_scram(next(names)), reps)))  # fmt: skip
    width = max(len(label) for label, _ in rows)
    print(f"{'what':<{width}}  ms/call")
    for label, value in rows:
        print(f"{label:<{width}}  {value:8.3f}")


if __name__ == "__main__":
    main()
