from dilexp.main import main

main()
