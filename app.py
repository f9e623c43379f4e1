"""
The web demo of scta-search, as a Space would run it: `python app.py --index DIR` is `scta-search serve --index DIR`
(the Gradio demo at http://127.0.0.1:8000/ and the JSON API under /api, one model in memory).

    pip install -e ".[app]"
    scta-search index --model outputs/demo_synthetic --images outputs/shapes-photos/test --index outputs/shapes.scta
    python app.py --index outputs/shapes.scta          # then open http://127.0.0.1:8000
"""

import sys

from scta_search.cli import main


if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
