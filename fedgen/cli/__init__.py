"""The `fedgen` command line. Commands validate their input, then call plain functions.

Each group of commands lives in its own module (data, run, consortium, audit, review); this module
builds the command tree. A user mistake (FedgenError) is shown as one line on stderr with exit
code 1 (fedgen.cli.common.Group); anything else is a bug and stays loud.
"""

from __future__ import annotations

import typer

from fedgen.cli import audit, consortium, data, review, run
from fedgen.cli.common import EXIT_REFUSED, EXIT_USER_ERROR, Group

__all__ = ["app", "EXIT_USER_ERROR", "EXIT_REFUSED"]

app = typer.Typer(
    cls=Group,
    help="fedgen: privacy-audited federated generation of synthetic health data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("demo-data")(data.demo_data)
app.command("demo-public")(data.demo_public)
app.command()(run.pretrain)
app.command()(run.simulate)
app.command()(run.generate)
app.command()(run.ledger)
app.command()(consortium.server)
app.command()(consortium.client)
app.command()(consortium.certs)

data_app = typer.Typer(cls=Group, help="Inspect and validate site data.", no_args_is_help=True)
data_app.command("check")(data.data_check)
data_app.command("heldout")(data.data_heldout)
app.add_typer(data_app, name="data")

audit_app = typer.Typer(
    cls=audit.AuditGroup,
    help="Audit a run before release (`fedgen audit RUN`), or scan texts for PHI (`fedgen audit phi`).",
    no_args_is_help=True,
)
audit_app.command(audit.AUDIT_RUN_COMMAND)(audit.audit_run)
audit_app.command("phi")(audit.audit_phi)
app.add_typer(audit_app, name="audit")
app.command()(audit.release)

review_app = typer.Typer(
    cls=Group, help="A blinded real-or-synthetic review by clinicians, run at a site.", no_args_is_help=True
)
review_app.command("kit")(review.review_kit)
review_app.command("score")(review.review_score)
app.add_typer(review_app, name="review")
