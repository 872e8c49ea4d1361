"""Every reply line the core's tests expect, in one table (aiosmtpd's statuscodes idea).

Lines are ``str`` without the CRLF so transcripts can interpolate them;
``wire(*lines)`` turns them into the bytes a client receives.  Texts that the
application chooses (the test ``App`` in ``helpers``) are here too, next to
the RFC 1939 example they imitate.
"""

from __future__ import annotations

# ------------------------------------------------------------ RFC 1939 examples

#: RFC 1939 section 7: the APOP example's greeting timestamp and secret.
RFC_TIMESTAMP = "<1896.697170952@dbc.mtview.ca.us>"
RFC_SECRET = "tanstaaf"
RFC_DIGEST = "c4c9334bac560ecc979e58001b3e22fb"

GREETING = f"+OK POP3 server ready {RFC_TIMESTAMP}"
#: ``Greeting()`` with its default text.
GREETING_DEFAULT = "+OK POP3 server ready."
#: What the test App says on login (RFC 1939 section 10 wording).
MAILDROP_2 = "+OK mrose's maildrop has 2 messages (320 octets)"
SIGN_OFF_EMPTY = "+OK dewey POP3 server signing off (maildrop empty)"
SIGN_OFF_2_LEFT = "+OK dewey POP3 server signing off (2 messages left)"
SIGN_OFF_1_LEFT = "+OK dewey POP3 server signing off (1 messages left)"
IN_USE = "-ERR [IN-USE] maildrop already locked"
BAD_CREDENTIALS = "-ERR [AUTH] Authentication failed."

# ------------------------------------------------------------ positive replies (core texts)

OK = "+OK"
END = "."
LOGGED_IN = "+OK Logged in."
LOGGING_OUT = "+OK Logging out."
DELETED = "+OK Marked to be deleted."
UTF8_ENABLED = "+OK UTF8 enabled"
BEGIN_TLS = "+OK Begin TLS negotiation now."
CAPA = "+OK Capability list follows"
RSET_2 = "+OK maildrop has 2 messages (320 octets)"
STAT_2 = "+OK 2 320"
LIST_2 = "+OK 2 messages (320 octets)"
#: The SASL challenge for empty data: "+" and a space (kept out of the source's line ends).
EMPTY_CHALLENGE = "+ "
CHALLENGE_USERNAME = "+ VXNlcm5hbWU6"
CHALLENGE_PASSWORD = "+ UGFzc3dvcmQ6"

# ------------------------------------------------------------ -ERR replies (core texts)

UNKNOWN = "-ERR Unknown command."
WRONG_STATE = "-ERR Command not valid in this state."
SYNTAX = "-ERR Syntax error."
NO_SUCH_MESSAGE = "-ERR No such message."
MESSAGE_DELETED = "-ERR Message is deleted."
BAD_NUMBER = "-ERR Invalid message number."
BAD_LINE_COUNT = "-ERR Invalid line count."
NO_USERNAME = "-ERR No username given."
USER_DISABLED = "-ERR USER/PASS not available; use AUTH."
PLAINTEXT_DISALLOWED = (
    "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)
NON_ASCII_USER = "-ERR Non-ASCII user name needs the UTF8 command first."
BAD_USERNAME = "-ERR Invalid user name."
APOP_UNAVAILABLE = "-ERR APOP not available."
APOP_BAD_ARGS = "-ERR Invalid APOP arguments."
UNSUPPORTED_MECHANISM = "-ERR Unsupported authentication mechanism."
BAD_INITIAL_RESPONSE = "-ERR Invalid base64 data in initial response."
BAD_BASE64 = "-ERR Invalid base64 data."
AUTH_ABORTED = "-ERR Authentication aborted."
AUTH_ABORTED_CODE = "-ERR [AUTH] Authentication aborted."
AUTH_FAILED = "-ERR Authentication failed."
STLS_DISABLED = "-ERR TLS support isn't enabled."
TLS_ACTIVE = "-ERR TLS is already active."
TLS_UNAVAILABLE = "-ERR TLS not available."
UTF8_UNAVAILABLE = "-ERR UTF8 not available."
DELETION_FAILED = "-ERR Deletion failed."
MESSAGE_UNAVAILABLE = "-ERR Message unavailable."

# The final lines before a RemoteProtocolError.
TOO_MANY_BAD = "-ERR Too many bad commands."
LINE_TOO_LONG = "-ERR Line too long."
NUL_IN_COMMAND = "-ERR NUL in command."
TOO_MUCH_INPUT = "-ERR Too much input."

# ------------------------------------------------------------ CAPA


def capa(*caps: str) -> list[str]:
    """The CAPA reply lines: status, the always-present tags, *caps*, terminator."""
    return [CAPA, "CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", *caps, END]


#: CAPA with the default Config before login, on a cleartext connection.
CAPA_AUTHORIZATION = capa(
    "USER", "SASL PLAIN LOGIN", "UTF8 USER", "LANG", "IMPLEMENTATION pop3proto"
)
#: CAPA with the default Config after login.
CAPA_TRANSACTION = capa("LANG", "IMPLEMENTATION pop3proto")


def wire(*lines: str) -> bytes:
    """Reply lines as the client receives them (UTF-8, CRLF after each)."""
    return "".join(line + "\r\n" for line in lines).encode("utf-8")
