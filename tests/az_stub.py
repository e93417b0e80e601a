"""A stand-in for the Azure CLI, put first on PATH by the tests as an executable named `az`.

It answers `az account get-access-token --output json --resource R [--tenant T]` the way the real CLI
does, driven by state.json beside it, and appends each call to calls.log (and its pid to pids.log) so
tests can count them and find any left running.
state.json keys: mode (ok | logged_out | fail | garbage | hang), delay (seconds), lifetime (seconds),
audience (overrides the resource in the token's aud claim), tenant, token (hand out exactly this token),
message (what logged_out and fail print).
"""

import base64
import fcntl
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> int:
    with open(os.path.join(HERE, "state.json")) as handle:
        state = json.load(handle)
    with open(os.path.join(HERE, "pids.log"), "a") as handle:
        handle.write(f"{os.getpid()}\n")
    with open(os.path.join(HERE, "calls.log"), "a") as handle:
        handle.write(json.dumps(sys.argv[1:]) + "\n")
    time.sleep(state.get("delay", 0))
    mode = state.get("mode", "ok")
    if mode == "hang":
        time.sleep(3600)
    if mode == "logged_out":
        print(state.get("message", "ERROR: Please run 'az login' to setup account."), file=sys.stderr)
        return 1
    if mode == "fail":
        message = state.get("message", "ERROR: AADSTS700082: The refresh token has expired due to inactivity.")
        print(message, file=sys.stderr)
        return 1
    if mode == "garbage":
        print("this is not json")
        return 0
    args = sys.argv[1:]
    if args[:2] != ["account", "get-access-token"] or "--resource" not in args:
        print(f"ERROR: the az stand-in does not know {' '.join(args)!r}", file=sys.stderr)
        return 2
    resource = args[args.index("--resource") + 1]
    tenant = args[args.index("--tenant") + 1] if "--tenant" in args else state.get("tenant", "tenant-one")

    with open(os.path.join(HERE, "issued.log"), "a+") as issued:
        fcntl.flock(issued, fcntl.LOCK_EX)
        issued.seek(0)
        serial = len(issued.read().splitlines()) + 1
        expires_on = int(time.time() + state.get("lifetime", 3600))
        claims = {
            "aud": state.get("audience", resource),
            "tid": tenant,
            "upn": "radiologist@example.org",
            "exp": expires_on,
            "serial": serial,
        }
        header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        token = state.get("token") or f"{header}.{b64(json.dumps(claims).encode())}.stub-signature-{serial}"
        issued.write(token + "\n")
    local = time.strftime("%Y-%m-%d %H:%M:%S.000000", time.localtime(expires_on))
    answer = {
        "accessToken": token,
        "expiresOn": local,
        "expires_on": expires_on,
        "subscription": "00000000-0000-0000-0000-000000000000",
        "tenant": tenant,
        "tokenType": "Bearer",
    }
    print(json.dumps(answer, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
