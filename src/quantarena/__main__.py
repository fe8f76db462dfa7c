from quantarena.cli import main

main()
