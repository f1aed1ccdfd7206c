from glmvoice_cli.cli import main

main()
