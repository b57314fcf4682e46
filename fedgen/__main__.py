from fedgen.cli import app

app(prog_name="fedgen")
