from glmvoice_cli.entry import main

main()
