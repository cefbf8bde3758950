import RemusCore
