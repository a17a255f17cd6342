"""MLflow *model from code* entry point: ``mlflow.pyfunc.log_model(python_model=<this file>)``.

MLflow executes this file when the model is loaded, so no pickled Python object is stored.
"""

import mlflow

from masksam.components._pyfunc import MaskSAMPyfunc

mlflow.models.set_model(MaskSAMPyfunc())
