"""Who may talk to a node: TLS material (``tls``), client roles (``roles``), and the
``raftfast certs`` command that makes a development CA and certificates (``certs``)."""
