#!/usr/bin/python3
"""Python's smtplib against the ingress: PIPELINING (a pipelined envelope) and CHUNKING (BDAT).
Usage: smtp_pipelining.py HOST PORT. Prints the queue ids, one per line."""
import smtplib
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = smtplib.SMTP(host, port, timeout=30)
code, _ = s.ehlo("client.example.com")
assert code == 250
assert s.has_extn("pipelining"), "PIPELINING not offered"
assert s.has_extn("chunking"), "CHUNKING not offered"

# One write for the whole envelope (RFC 2920), then the replies in order.
s.sock.sendall(b"MAIL FROM:<pipe@example.com>\r\nRCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
for expected in (250, 250, 250, 354):
    code, msg = s.getreply()
    assert code == expected, (expected, code, msg)
s.sock.sendall(b"Subject: pipelined\r\n\r\nbody\r\n.\r\n")
code, msg = s.getreply()
assert code == 250, (code, msg)
print(msg.decode().split()[-1])

# BDAT in two chunks (RFC 3030).
body = b"Subject: chunked\r\n\r\n" + b"x" * 3000 + b"\r\n"
code, _ = s.docmd("MAIL FROM:<chunk@example.com>")
assert code == 250
code, _ = s.docmd("RCPT TO:<c@dest.test>")
assert code == 250
first, second = body[:1000], body[1000:]
s.sock.sendall(b"BDAT %d\r\n" % len(first) + first)
code, msg = s.getreply()
assert code == 250, (code, msg)
s.sock.sendall(b"BDAT %d LAST\r\n" % len(second) + second)
code, msg = s.getreply()
assert code == 250, (code, msg)
print(msg.decode().split()[-1])
s.quit()
