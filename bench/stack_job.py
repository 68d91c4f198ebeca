"""The README's "Real PyPI stacks" job: pandas + scikit-learn on 5,000 rows, timed in the guest.

    vmiso run --image IMAGE -i bench/stack_job.py -o OUT -- python stack_job.py

Prints one JSON line: seconds spent importing and fitting, and the model's accuracy
(the same on every CPU the guest may have, or the CPU computes wrongly).
"""
import json
import os
import time

started = time.perf_counter()
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

imported = time.perf_counter()
rng = np.random.default_rng(7)
frame = pd.DataFrame(rng.standard_normal((5000, 8)), columns=[f"x{i}" for i in range(8)])
frame["y"] = (frame[["x0", "x1", "x2"]].sum(axis=1) + 0.3 * rng.standard_normal(5000) > 0).astype(int)
model = LogisticRegression(max_iter=500).fit(frame.drop(columns="y"), frame["y"])
frame["p"] = model.predict_proba(frame.drop(columns="y"))[:, 1]
frame.to_csv(os.path.join(os.environ.get("VMISO_OUT", "."), "scored.csv"), index=False)
done = time.perf_counter()
print(json.dumps({"import_s": round(imported - started, 2), "fit_s": round(done - imported, 2),
                  "total_s": round(done - started, 2),
                  "accuracy": round(float(model.score(frame.drop(columns=["y", "p"]), frame["y"])), 4),
                  "coef": [round(float(c), 4) for c in model.coef_[0][:3]]}))
