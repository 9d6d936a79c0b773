from .cli import main

if __name__ == "__main__":  # importing it (a tool, a spawned child) must not start apportion
    main()
