#!/usr/bin/env python3
"""An HBONE client written against the protocol, not against interceptor's code: Python's ssl
(OpenSSL) for mutual TLS 1.3 with ALPN h2, and hyper-h2 (python3-h2) for HTTP/2. It sends
CONNECT requests shaped like ztunnel's (authority, baggage, forwarded, traceparent) over one
tunnel and prints one JSON line per request: the response status and, for a 200, what the
destination echoed back and whether the stream then ended cleanly.

Usage: hbone_client.py TUNNEL_IP:PORT CA_PEM CERT_PEM KEY_PEM AUTHORITY[,METHOD] ...
"""
import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

TIMEOUT = 5.0


def main():
    tunnel, ca, cert, key, *requests = sys.argv[1:]
    host, port = tunnel.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    # SPIFFE identities are URIs, not host names: the chain is verified, the name is not.
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    tls = context.wrap_socket(raw, server_hostname="hbone.test.invalid")
    if tls.selected_alpn_protocol() != "h2":
        raise SystemExit(f"ALPN: {tls.selected_alpn_protocol()!r}")
    # h2 4.1 (Debian 12's) insists on :scheme and :path in every request it sends, which a
    # CONNECT must not carry (RFC 9113 8.5); newer releases know CONNECT. Its own check of
    # what it sends is turned off; what it receives is still checked.
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    streams = {}
    for spec in requests:
        authority, _, method = spec.partition(",")
        method = method or "CONNECT"
        headers = [(":method", method), (":authority", authority)]
        if method != "CONNECT":
            headers += [(":scheme", "http"), (":path", "/")]
        headers += [
            ("baggage", "k8s.namespace.name=default,k8s.deployment.name=outsider"),
            ("forwarded", 'for="%s:%d"' % tls.getsockname()),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ]
        headers = [(name.encode(), value.encode()) for name, value in headers]
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers)
        streams[stream_id] = {"request": spec, "status": None, "echo": b"", "ended": False}
    tls.sendall(conn.data_to_send())
    deadline = time.monotonic() + TIMEOUT
    sent = set()
    while time.monotonic() < deadline and not all(
        s["ended"] or (s["status"] not in (None, 200)) for s in streams.values()
    ):
        data = tls.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            state = streams.get(getattr(event, "stream_id", None))
            if isinstance(event, h2.events.ResponseReceived):
                state["status"] = int(dict(event.headers)[b":status"])
                if state["status"] == 200 and event.stream_id not in sent:
                    # The tunnel is open: send a message and half-close.
                    message = ("hello over stream %d" % event.stream_id).encode()
                    conn.send_data(event.stream_id, message, end_stream=True)
                    sent.add(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                state["echo"] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                state["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                state["reset"] = int(event.error_code)
                state["ended"] = True
        tls.sendall(conn.data_to_send())
    for state in streams.values():
        state["echo"] = state["echo"].decode(errors="replace")
        print(json.dumps(state))
    conn.close_connection()
    tls.sendall(conn.data_to_send())
    tls.close()


if __name__ == "__main__":
    main()
