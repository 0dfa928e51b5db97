from mapoco.cli import main

main()
