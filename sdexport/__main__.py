from sdexport.cli import entry

entry()
