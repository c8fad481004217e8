from csi_wasm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
