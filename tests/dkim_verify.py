#!/usr/bin/python3
"""Verifies a message's DKIM signature with python3-dkim, fetching the public key from the
DNS server on loopback that the test started. Usage: dkim_verify.py DNS_PORT MESSAGE_FILE"""
import sys

import dkim
import dns.resolver

port = int(sys.argv[1])
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = port


def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    answer = resolver.resolve(name.rstrip("."), "TXT", lifetime=timeout)
    return b"".join(b"".join(r.strings) for r in answer)


with open(sys.argv[2], "rb") as f:
    message = f.read()
ok = dkim.verify(message, dnsfunc=dnsfunc)
print("signature ok" if ok else "signature FAILED")
sys.exit(0 if ok else 1)
