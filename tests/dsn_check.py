#!/usr/bin/python3
"""Parses delivery status notifications with Python's email package and prints, as JSON,
what a structural check needs: the content types of the parts, the report type, the
per-message and per-recipient fields, and what the third part returns."""
import email
import email.policy
import json
import sys

out = []
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        msg = email.message_from_binary_file(f, policy=email.policy.compat32)
    d = {
        "file": path,
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "from": msg.get("From"),
        "to": msg.get("To"),
        "subject": msg.get("Subject"),
        "auto_submitted": msg.get("Auto-Submitted"),
        "envelope_from": msg.get("X-Sink-Mail-From"),
        "defects": [type(x).__name__ for x in msg.defects],
    }
    if msg.is_multipart():
        parts = msg.get_payload()
        d["parts"] = [p.get_content_type() for p in parts]
        if len(parts) >= 2 and parts[1].get_content_type() == "message/delivery-status":
            blocks = parts[1].get_payload()
            d["per_message"] = dict(blocks[0].items())
            d["recipients"] = [dict(b.items()) for b in blocks[1:]]
        if len(parts) >= 3:
            third = parts[2]
            if third.get_content_type() == "message/rfc822":
                inner = third.get_payload()[0]
                d["returned_subject"] = inner.get("Subject")
                d["returned_body"] = inner.get_payload()
            else:
                inner = email.message_from_string(third.get_payload())
                d["returned_subject"] = inner.get("Subject")
                d["returned_body"] = inner.get_payload()
    out.append(d)
print(json.dumps(out))
