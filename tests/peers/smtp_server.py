#!/usr/bin/env python3
"""Herald's test SMTP server: a real SMTP peer (aiosmtpd, from Debian) that stores every accepted
message in a Maildir, so tests and the demo can see what Herald sent.

Optional: --require-auth USER:PASS (AUTH PLAIN/LOGIN, only after STARTTLS when --tls-cert is set),
--tls-cert/--tls-key (STARTTLS, required before anything else), and --implicit-tls (TLS from the
first byte, as on port 465, instead of STARTTLS)."""
import argparse
import asyncio
import mailbox
import os
import ssl

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class MaildirHandler:
    def __init__(self, path):
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        self.box = mailbox.Maildir(path, create=True)

    async def handle_DATA(self, server, session, envelope):
        msg = mailbox.MaildirMessage(envelope.original_content or envelope.content)
        # Keep the SMTP envelope: tests assert on who the message really went to.
        msg["X-Herald-Envelope-To"] = ",".join(envelope.rcpt_tos)
        self.box.add(msg)
        return "250 OK stored"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=2525)
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--require-auth")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--implicit-tls", action="store_true")
    a = ap.parse_args()

    kwargs = {}
    if a.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        if a.implicit_tls:
            kwargs.update(ssl_context=ctx)
        else:
            kwargs.update(tls_context=ctx, require_starttls=True)
    if a.require_auth:
        user, pw = a.require_auth.split(":", 1)

        def auth(server, session, envelope, mechanism, data):
            ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == pw
            # handled=False makes aiosmtpd answer 535 on failure (otherwise it answers nothing).
            return AuthResult(success=ok, handled=False)

        # With implicit TLS aiosmtpd does not see the session as TLS: do not require it again.
        kwargs.update(authenticator=auth, auth_required=True,
                      auth_require_tls=bool(a.tls_cert) and not a.implicit_tls)
    ctl = Controller(MaildirHandler(a.maildir), hostname="127.0.0.1", port=a.port, **kwargs)
    ctl.start()
    print(f"smtp listening on 127.0.0.1:{a.port}, maildir {a.maildir}", flush=True)
    try:
        asyncio.get_event_loop().run_forever()
    finally:
        ctl.stop()


if __name__ == "__main__":
    main()
