from sdexport.cli import main

main()
