"""`dmp pki`: the federation's root CA, its certificates and its revocation list."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from dmp.cli.common import CommandError, add_pki
from dmp.identity import PROFESSIONS, Principal
from dmp.pki import DEFAULT_HOSTS, Pki
from dmp.printing import print_table
from dmp.regions import REGIONS

_DESCRIPTION = """\
The federation PKI: one root CA (ECDSA P-256) that issues a certificate to every node, to
the directory, to every professional and to every patient. Who a certificate belongs to is
the urn:dmp:... URI in its SubjectAltName. The PKI directory holds ca.pem, ca.key (keep it
secret), crl.pem and one <identity>.pem/.key pair per identity, named node-<region>,
directory, practitioner-<RPPS> or patient-<INS>.
"""

_EXAMPLES = """\
examples:
  dmp pki init --pki ./pki
  dmp pki issue node --region 11 --host node-11.example.org --pki ./pki
  dmp pki issue directory --host directory.example.org --pki ./pki
  dmp pki issue practitioner --rpps 10003456789 --profession doctor --name "Dr Claire Martin" \\
      --pki ./pki
  dmp pki issue patient --ins 185027512345625 --name "Jean Dupont" --pki ./pki
  dmp pki revoke practitioner-10003456789 --pki ./pki
  dmp pki list --pki ./pki
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of days")
    return value


def _add_days_option(parser: argparse.ArgumentParser, default_days: int) -> None:
    parser.add_argument(
        "--days",
        metavar="N",
        type=_positive_int,
        default=None,
        help=f"validity in days (default: {default_days})",
    )


def _add_host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        metavar="H",
        action="append",
        dest="hosts",
        default=None,
        help="a DNS name or IP address clients use to reach the service; repeat for several"
        f" (default: {' and '.join(DEFAULT_HOSTS)})",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `dmp pki` and its subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    pki = sub.add_parser(
        "pki",
        help="manage the federation PKI: root CA, certificates, revocation",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=formatter,
    )
    commands = pki.add_subparsers(dest="pki_command", metavar="SUBCOMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="create the root CA and an empty revocation list",
        description="Create the federation root CA (ca.pem, ca.key with mode 0600) and an"
        " empty signed revocation list (crl.pem) in the PKI directory, creating it if"
        " needed. Refuses if the directory already holds a CA: a new CA would invalidate"
        " every certificate issued so far.",
    )
    add_pki(init)
    init.add_argument(
        "--days",
        metavar="N",
        type=_positive_int,
        default=3650,
        help="validity of the CA in days (default: 3650)",
    )
    init.set_defaults(handler=_init)

    issue = commands.add_parser(
        "issue",
        help="issue a certificate and a new key to an identity",
        description="Issue a certificate signed by the federation CA and a new ECDSA P-256"
        " key, written as DIR/<identity>.pem and DIR/<identity>.key (mode 0600). Issuing an"
        " identity again replaces its files (renewal); revoke the old certificate if its key"
        " may have leaked.",
    )
    kinds = issue.add_subparsers(dest="kind", metavar="KIND", required=True)

    node = kinds.add_parser(
        "node",
        help="a regional record node (server and client certificate)",
        description="Issue the certificate of a regional record node: URI urn:dmp:node:<region>,"
        " the host names as DNS/IP SubjectAltNames, server and client authentication. It"
        " always carries the DNS name node-<region>.dmp.internal too, which only this node's"
        " certificate may carry: the directory reaches the region only at a server holding"
        " it. A node certificate issued before that name existed must be reissued.",
    )
    node.add_argument(
        "--region",
        metavar="CODE",
        required=True,
        help=f"INSEE region code, one of {', '.join(sorted(REGIONS))}",
    )
    _add_host_option(node)
    _add_days_option(node, 825)
    add_pki(node)
    node.set_defaults(handler=_issue_node)

    directory = kinds.add_parser(
        "directory",
        help="the national directory (server and client certificate)",
        description="Issue the certificate of the national directory: URI urn:dmp:directory,"
        " the host names as DNS/IP SubjectAltNames, server and client authentication.",
    )
    _add_host_option(directory)
    _add_days_option(directory, 825)
    add_pki(directory)
    directory.set_defaults(handler=_issue_directory)

    practitioner = kinds.add_parser(
        "practitioner",
        help="a health professional (client certificate)",
        description="Issue the client certificate of a health professional: URI"
        " urn:dmp:practitioner:<RPPS>, the profession in the subject (TITLE).",
    )
    practitioner.add_argument(
        "--rpps", metavar="ID", required=True, help="the RPPS number: exactly 11 digits"
    )
    practitioner.add_argument(
        "--profession",
        metavar="P",
        required=True,
        help=f"one of {', '.join(PROFESSIONS)} (an emergency doctor is a doctor)",
    )
    practitioner.add_argument(
        "--name", required=True, help="the name shown in the certificate (at most 64 characters)"
    )
    _add_days_option(practitioner, 365)
    add_pki(practitioner)
    practitioner.set_defaults(handler=_issue_practitioner)

    patient = kinds.add_parser(
        "patient",
        help="a patient (client certificate)",
        description="Issue the client certificate of a patient: URI urn:dmp:patient:<INS>.",
    )
    patient.add_argument(
        "--ins",
        required=True,
        help="the INS: 13-character NIR and its 2-digit key (spaces allowed)",
    )
    patient.add_argument(
        "--name", required=True, help="the name shown in the certificate (at most 64 characters)"
    )
    _add_days_option(patient, 365)
    add_pki(patient)
    patient.set_defaults(handler=_issue_patient)

    revoke = commands.add_parser(
        "revoke",
        help="revoke the current certificate of an identity, or a certificate file",
        description="Add the current certificate of IDENTITY (or the certificate in --cert"
        " FILE: a region's predecessor node after a hand-over) to the revocation list"
        " (crl.pem) and re-sign it. Nodes and the directory re-read crl.pem on change and"
        " refuse revoked certificates; copy crl.pem to them if they do not share this"
        " directory.",
    )
    revoke.add_argument(
        "identity",
        metavar="IDENTITY",
        nargs="?",
        help="node-<region>, directory, practitioner-<RPPS> or patient-<INS>",
    )
    revoke.add_argument(
        "--cert", type=Path, metavar="FILE", help="revoke this certificate (PEM) instead"
    )
    add_pki(revoke)
    revoke.set_defaults(handler=_revoke)

    listing = commands.add_parser(
        "list",
        help="list issued certificates and their state",
        description="List every certificate in the PKI directory: identity, URI, profession,"
        " expiry date and state (valid, not yet valid, expired or revoked).",
    )
    add_pki(listing)
    listing.set_defaults(handler=_list)


def _init(args: argparse.Namespace) -> int:
    pki = Pki.init(args.pki, days=args.days)
    print(f"created the federation root CA in {pki.directory}")
    print(f"  certificate: {pki.ca_pem_path}")
    print(f"  key:         {pki.ca_key_path} (keep it secret)")
    print(f"  CRL:         {pki.crl_path}")
    return 0


def _issued(pki: Pki, principal: Principal) -> int:
    print(f"issued {principal.uri}")
    print(f"  certificate: {pki.cert_path(principal.identity)}")
    print(f"  key:         {pki.key_path(principal.identity)}")
    return 0


def _hosts(args: argparse.Namespace) -> tuple[str, ...]:
    hosts: list[str] | None = args.hosts
    return tuple(hosts) if hosts else DEFAULT_HOSTS


def _issue_node(args: argparse.Namespace) -> int:
    pki = Pki(args.pki)
    return _issued(pki, pki.issue_node(args.region, hosts=_hosts(args), days=args.days))


def _issue_directory(args: argparse.Namespace) -> int:
    pki = Pki(args.pki)
    return _issued(pki, pki.issue_directory(hosts=_hosts(args), days=args.days))


def _issue_practitioner(args: argparse.Namespace) -> int:
    pki = Pki(args.pki)
    principal = pki.issue_practitioner(args.rpps, args.profession, args.name, days=args.days)
    return _issued(pki, principal)


def _issue_patient(args: argparse.Namespace) -> int:
    pki = Pki(args.pki)
    return _issued(pki, pki.issue_patient(args.ins, args.name, days=args.days))


def _revoke(args: argparse.Namespace) -> int:
    pki = Pki(args.pki)
    if (args.identity is None) == (args.cert is None):
        raise CommandError("give either IDENTITY or --cert FILE")
    if args.cert is not None:
        try:
            cert = x509.load_pem_x509_certificate(args.cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot read the certificate {args.cert}: {exc}") from None
        pki.revoke_certificate(cert)
        print(f"revoked {args.cert} (serial {cert.serial_number:x}): {pki.crl_path} updated")
        return 0
    pki.revoke(args.identity)
    print(f"revoked {pki.cert_path(args.identity).stem}: {pki.crl_path} updated")
    return 0


def _list(args: argparse.Namespace) -> int:
    pki = Pki(args.pki)
    now = datetime.now(UTC)
    rows = [("IDENTITY", "URI", "PROFESSION", "EXPIRES", "STATE")]
    rows += [
        (
            issued.identity,
            issued.uri,
            issued.profession or "-",
            issued.not_after.date().isoformat(),
            issued.state(now),
        )
        for issued in pki.list()
    ]
    if len(rows) == 1:
        print(f"no certificates issued in {pki.directory} yet")
        return 0
    print_table(rows)
    return 0
